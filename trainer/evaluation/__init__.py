"""The evaluation pipeline: score -> predictions table -> metrics -> report files."""
