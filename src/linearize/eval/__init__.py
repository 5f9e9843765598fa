"""Evaluation: perplexity protocol, lm-eval, probing, judge, speed, the eval command."""
