"""Text generation: iteration-level continuous batching. A sequence joins the running batch at the
next step and leaves it the step it finishes; each step runs once on the model thread."""
