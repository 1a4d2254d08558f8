"""Analysis of a run's samples: where each class sits in concept space, and when it is learned.

    probe_net   the concept probe's network and its training
    probe       concept probes for a data config: fit or cached, coordinates, accuracy
    dynamics    learning times, the memorised class, the turn: the paper's measures
    analyze     ``analyze.analyze_run``: a run's analysis.json from its samples
    claims      the paper's claims checked on an analysis (claims.json)
    stats       the statistics the claims use (rank correlation, bootstrap intervals)
    plots       the figures, from arrays and results (never from a directory)
"""
