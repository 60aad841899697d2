"""`capfast train`: config, the Trainer loop, optimizer, objectives (cross-entropy, SCST), what watches and reports."""
