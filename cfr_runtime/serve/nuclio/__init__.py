"""A nuclio function that CVAT registers as an interactor: `function.yaml` (what CVAT's lambda manager reads)
and `main.py` (the handler, which embeds cfr_runtime: no HTTP hop to a cfr-serve). Deployment: docs/cvat.md."""
