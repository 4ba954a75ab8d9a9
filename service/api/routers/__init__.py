"""One router per resource: counterfactual submissions, jobs, health."""
