"""Training: the one accelerate loop and the commands that bring a loss step to it."""
