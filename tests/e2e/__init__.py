"""E2E tests against the devcluster (a package so that their module names cannot clash with unit tests)."""
