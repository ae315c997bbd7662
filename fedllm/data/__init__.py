"""Site data: loading and schema checks, formatting and label masking, partitioning."""
