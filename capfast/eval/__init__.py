"""`capfast eval` and `capfast caption`: generate captions for a split or for image files, and score them."""
