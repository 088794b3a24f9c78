"""Style templates (templates/styles/*.yaml) and photo templates (templates/photos/NAME/)."""
