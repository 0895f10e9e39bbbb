"""Fuzzing: seed images shared by the hypothesis tests and the atheris harness."""
