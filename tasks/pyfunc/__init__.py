"""MLflow "models from code": the files MLflow runs to load a registered rnnflow model."""
