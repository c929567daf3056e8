"""Parse a data SOURCE argument (`kind:path` or a dataset spec file) into a DataSource."""

from __future__ import annotations

from pathlib import Path

from ctrserve.training.data.source import DataError, DataSource

KINDS = ("synth", "movielens", "frappe", "criteo", "libfm")


def open_source(arg: str) -> DataSource:
    """`synth:DIR`, `movielens:DIR`, `frappe:DIR`, `criteo:PATH`, `libfm:PATH`, or a .yaml/.json
    spec file (training/data/spec.py).

    An empty path after the colon means $CTR_DATA_DIR's default folder for that dataset.
    """
    kind, sep, path = arg.partition(":")
    if not sep:
        if Path(arg).suffix in (".yaml", ".yml", ".json"):
            from ctrserve.training.data.tabular import TabularSource

            return TabularSource.from_spec_file(arg)
        raise DataError(
            f"data source {arg!r}: expected KIND:PATH with KIND in {KINDS}, or a spec file"
        )
    if kind == "synth":
        from ctrserve.training.data.synthetic import SyntheticSource

        return SyntheticSource(path)
    if kind == "movielens":
        from ctrserve.training.data.movielens import MovieLensSource

        return MovieLensSource(path or None)
    if kind == "frappe":
        from ctrserve.training.data.frappe import FrappeSource

        return FrappeSource(path or None)
    if kind == "criteo":
        from ctrserve.training.data.criteo import CriteoSource

        return CriteoSource(path or None)
    if kind == "libfm":
        from ctrserve.training.data.tabular import libfm_source

        return libfm_source(path)
    raise DataError(f"data source {arg!r}: unknown kind {kind!r}; expected one of {KINDS}")
