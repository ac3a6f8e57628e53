"""The `TritonPythonModel` classes that model_repository/*/1/model.py re-export."""
