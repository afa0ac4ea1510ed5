"""CRM sync service: durable outbox and delivery to the customer's CRM, retried until done."""
