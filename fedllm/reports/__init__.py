"""What people read about a run: the run summary (``summary``), the privacy report of ``fedllm audit``
(``privacy_report`` builds it, ``privacy_markdown`` and ``epsilon_plot`` render it, ``privacy_statement``
says what is and is not guaranteed), the model card (``model_card``) and the canary audit's report
(``canary_report``). Every number is written by ``numbers``."""
