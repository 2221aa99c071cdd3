"""The placer: desired deployments to assignments, elected, fenced.

One scheduler process at a time (the elected one) turns DeploymentRecords into
AssignmentRecords, writing them in transactions fenced on its election.
:mod:`scheduler.placer.placement` is the decision itself, a pure function.
"""
