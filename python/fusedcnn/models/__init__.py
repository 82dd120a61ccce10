"""Models built from fusedcnn layers."""
