"""The built-in A/B dashboard: one HTML page per experiment, served by the scorer itself.

Design choice: the charts are inline SVG rendered on the server, in Python, by `svg.py`, on
the experiment's own days as `timeline.py` lays them out (with the deployments placed on the
clock the counts use); the page (`page.py`) is plain HTML with inline CSS and no JavaScript.
Why:

- nothing to build or fetch: no npm step, no CDN, so the page works offline, inside a
  firewalled cluster and from a laptop tunnelled to one replica;
- no new dependency on the serving side (the scorer installs only what it needs to score);
- testable like any other output: the figures sit in the HTML as text and `data-*`
  attributes (`data-arm`, `data-impressions`, ...), so plain string or HTML-parser assertions
  check them, and a headless browser only has to confirm that the page renders cleanly;
- hovering a point shows its exact value and interval (an SVG `<title>`), without a script.

The figures are those of `GET /v1/experiments/{name}/report`: the router calls the same
`service.counts.build_report`, so the page, the JSON report and `ctrserve report` agree.
Every text that comes from outside (arm, bundle, who, why) is escaped with `html.escape`.
"""
