"""The eval: dataset readers (:mod:`.readers`), answer metrics (:mod:`.metrics`) and the pruning-impact
audit (:mod:`.audit`). Submodules import their optional dependencies (sacrebleu, rouge-score, nibabel,
Pillow) only when they use them."""
