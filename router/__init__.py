"""kvtier gRPC router: servicer, validation, routing policies and the cluster-wide prefix index."""
