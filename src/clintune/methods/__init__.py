"""Methods: one LightningModule per training method, and the pure loss math they share."""
