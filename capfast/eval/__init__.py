"""`capfast eval` and `capfast caption`: generate captions for a split or for image files, and score them; the
CIDEr-D reward that SCST trains with (reward.py, on cider.py)."""
