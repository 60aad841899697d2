"""The write side: `capfast convert` and `capfast synth` turn images and captions into betons."""
