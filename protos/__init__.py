"""kvtier protobuf definitions (package kvtier.v1) and their generated stubs."""
