"""What people read: the run summary, the privacy report, the canary-audit report and the model card."""
