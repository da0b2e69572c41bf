"""The before/after fairness report: `python -m minimedi.evaluate --run DIR` (align.py writes it when done).

The numbers come from `minimedi.evaluate.fairness_report`, the files from `minimedi.report.write_report`:
report.md, report.json, fairness.png and samples/before_after.png in the run folder.
"""
from minimedi.classifier import load_classifier
from minimedi.evaluate import fairness_report
from minimedi.report import write_report


def make_report(cfg, d):
    """Write the report of the run's models; a run whose classifier is not a sex classifier gets none."""
    _, ckpt = load_classifier(f"{cfg.run_dir}/classifier.pt")
    if ckpt["classes"] != ["male", "female"]:
        print(f"the fairness report reads sex; skipped for a {'/'.join(ckpt['classes'])} classifier")
        return None
    report, images = fairness_report(cfg, d.device)
    for path in write_report(cfg.run_dir, report, images):
        print(f"wrote {path}")
    return report
