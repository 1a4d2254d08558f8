"""Hidden capabilities: eliciting the held-out class before plain prompting produces it.

    prompts     prompt arithmetic: overprompts, the reference class, compositions (``sd`` uses it)
    edits       activation edits at a network's tap points: steering and composition
    measure     ``measure.elicit_run``: every arm at every checkpoint of a run (elicit.json)
    plots       the elicitation figures
"""
