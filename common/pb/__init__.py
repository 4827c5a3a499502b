"""Generated gRPC stubs of protos/llmcluster/v1 (see common/protogen.py)."""
