"""Training systems: the LightningModules that train the networks of models/."""
