"""The training system's parts that are not the LightningModule: settings, the PPO update, precision, sharding."""
