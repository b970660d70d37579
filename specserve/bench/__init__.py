"""`specserve bench`: offline acceptance/speed runs, serving load tests and A/B comparison of drafter arms."""
