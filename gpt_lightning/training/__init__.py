"""The Lightning shell: the LightningModule, the data modules, callbacks, the logger and the CLI."""
