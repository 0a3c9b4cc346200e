"""Post-deployment monitoring: reads the prediction log, estimates label shift and data drift,
and acts (prior adaptation, retraining trigger, active learning).

Beside ``serving``: it never imports ``serving`` or ``training``. It talks to a running app
only through Serve's public REST API (``user_config`` → ``reconfigure``) and to Ray through the
Jobs API.
"""
