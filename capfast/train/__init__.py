"""`capfast train`: the config, the Trainer loop, its optimizer, objectives (cross-entropy, SCST) and monitoring."""
