"""`python -m ktjax.train`: the demo model's training command (the code is ktjax/demo/train.py).

A package with a __main__ rather than a ktjax/train.py module, so that the old train.py's history and
pending edits follow it to ktjax/demo/train.py (git sees a rename only where the old path is gone).
"""
