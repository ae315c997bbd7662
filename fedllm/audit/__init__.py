"""Privacy audit: the report of what each site spent (``report``) and the empirical canary audit
(``canaries``)."""
