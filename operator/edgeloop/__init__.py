"""edgeloop: a Kopf operator for AI inference and federated learning on k3s edge fleets."""
