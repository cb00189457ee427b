"""Triton kernels. Importing this package does not import Triton; its modules do."""
