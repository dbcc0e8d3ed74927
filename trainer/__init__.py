"""Training side of cfr-icl: the SimpleClick/CFR-ICL network, checkpoints, data, SUEM, ICL."""
