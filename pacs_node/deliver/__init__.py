"""The deliver stage: sends stored results to their destinations.

- :mod:`~pacs_node.deliver.dispatcher`: the loop (claim, leases, send, record outcomes);
- :mod:`~pacs_node.deliver.base`: outcomes, status classification, backoff and
  :class:`~pacs_node.deliver.base.Sender`, the interface of a destination protocol;
- :mod:`~pacs_node.deliver.dimse` (C-STORE SCU) and :mod:`~pacs_node.deliver.dicomweb` (STOW-RS): the senders;
- :mod:`~pacs_node.deliver.senders`: the registry, destination ``type`` -> sender;
- :mod:`~pacs_node.deliver.ledger`: operators' list, retry and cancel of deliveries;
- :mod:`~pacs_node.deliver.scu`: plain C-ECHO and C-STORE tools for the CLI and tests.
"""
