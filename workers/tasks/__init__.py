"""Celery tasks: thin wrappers that decode arguments and call plain functions."""
