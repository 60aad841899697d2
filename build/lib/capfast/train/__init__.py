"""Training: config, the Trainer loop, DDP plumbing, optimizer, monitoring."""
