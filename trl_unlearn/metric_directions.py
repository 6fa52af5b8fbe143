"""What "better" means for each metric the package reports: the report tables, the model card and `trl-unlearn
eval --update_model_card` read it (see docs/evaluation.md)."""

DIRECTIONS = {
    "forget_quality": "higher",
    "model_utility": "higher",
    "forget_probability": "~ retain model (lower)",
    "forget_rougeL_recall": "~ retain model (lower)",
    "forget_truth_ratio": "~ retain model (higher)",
    "verbmem_forget": "lower (~ retrained)",
    "knowmem_forget": "lower (~ retrained)",
    "knowmem_retain": "higher",
    "privleak": "-> 0",
    "privleak_auc": "~ retrained (~0.5)",
}


def direction(name: str) -> str:
    """What "better" means for the metric `name` (`DIRECTIONS`, or by its prefix); "" when unknown."""
    if name in DIRECTIONS:
        return DIRECTIONS[name]
    if name.startswith(("retain_", "real_authors_", "world_facts_")):
        return "higher"
    if name.startswith("mia_auc"):
        return "~ retrained (~0.5)"
    return ""
