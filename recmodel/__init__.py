"""recsys-retrain: keeps a transformer recommender fresh and publishes top-K tables to Postgres."""

__version__ = "0.1.0"
