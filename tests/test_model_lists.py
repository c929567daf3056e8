"""The model tests keep their own lists of model names (test_trainer, test_models_family,
test_models_pnn); together they must cover models/registry.py, each model exactly once, so a
model added to the registry cannot go untrained, unexported and unchecked for parity."""

from __future__ import annotations

from collections import Counter

from ctrserve.models.registry import MODELS as REGISTERED
from tests.test_models_family import FAMILY_MODELS
from tests.test_models_pnn import PNN_MODELS
from tests.test_trainer import MODELS as TRAINER_MODELS

LISTS = {"tests/test_trainer.py MODELS": TRAINER_MODELS,
         "tests/test_models_family.py FAMILY_MODELS": FAMILY_MODELS,
         "tests/test_models_pnn.py PNN_MODELS": PNN_MODELS}


def test_the_model_tests_cover_every_registered_model_once():
    listed = Counter(name for names in LISTS.values() for name in names)
    twice = sorted(name for name, n in listed.items() if n > 1)
    assert not twice, f"listed by more than one model test: {twice}"
    untested = sorted(set(REGISTERED) - set(listed))
    assert not untested, f"registered in models/registry.py but in no model test: {untested}"
    unknown = sorted(set(listed) - set(REGISTERED))
    assert not unknown, f"model tests name models the registry does not have: {unknown}"
