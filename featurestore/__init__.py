"""LanceDB feature store: item catalogs, encoded features, interactions and queries."""
