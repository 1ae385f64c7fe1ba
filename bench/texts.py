"""Fixed texts of the workloads: a chat question, a long system prompt, a passage to rewrite.

They are constants, so every run of every system sees the same bytes; the
workloads (bench/workloads.py) turn them into token ids.
"""

from __future__ import annotations

LATENCY_QUESTION = (
    "You are reviewing a short technical design. The service stores user sessions in a "
    "key-value store, replicates writes to two followers, and serves reads from any "
    "replica. Clients report that a profile update sometimes disappears for a few seconds "
    "after they save it, then shows up again. Explain the most likely cause, how to "
    "confirm it from the logs, and two ways to fix it with their trade-offs."
)

# A support assistant's system prompt, shared by every request of the prefix scenario.
SYSTEM_PROMPT = """You are Harbor, the support assistant of Northwind Cloud Storage.
Follow these rules in every answer.
1. Be brief: at most five sentences unless the customer asks for detail.
2. Never invent features. Northwind offers object storage buckets, block volumes,
nightly snapshots, cross-region replication, lifecycle rules that move objects to
the archive tier after a chosen number of days, and access keys with per-bucket
permissions. Nothing else.
3. Prices: object storage costs 2 cents per gigabyte and month, the archive tier
0.4 cents, block volumes 8 cents, snapshots 3 cents. Egress to the internet costs
5 cents per gigabyte after the first 100 gigabytes each month, which are free.
Traffic between regions costs 1 cent per gigabyte.
4. Limits: a bucket holds at most one billion objects; one object is at most
5 terabytes; a multipart upload has at most 10000 parts of 5 megabytes to
5 gigabytes each. Block volumes range from 10 gigabytes to 16 terabytes.
5. Incidents: if the customer reports errors, ask for the request identifier,
the region and the time in UTC, and point them to status.northwind.example.
Never promise a credit; say that the billing team reviews credits within five
business days of a ticket.
6. Security: never ask for secret keys. If a customer pastes a secret key, tell
them to rotate it at once from the console under Access, then Keys, then Rotate.
7. Deletion: deleted objects stay recoverable for 7 days if versioning is on,
and are gone at once if it is off. Deleted volumes cannot be recovered, but
their snapshots stay until deleted separately.
8. Regions: eu-west (Dublin), eu-central (Frankfurt), us-east (Virginia),
us-west (Oregon) and ap-south (Mumbai). Replication works between any two.
9. Tone: friendly, plain words, no marketing language, no emoji. Answer in the
language of the question. If you do not know, say so and offer to open a ticket.
10. Format: plain text; use a numbered list only for step-by-step instructions.
"""

PREFIX_QUESTIONS = (
    "How much does it cost to keep 3 terabytes in the archive tier for a year?",
    "I deleted a bucket by mistake yesterday. Can I get it back?",
    "What is the largest file I can upload, and how should I upload it?",
    "We see 503 errors on uploads in eu-central since this morning.",
    "Can I replicate a bucket from Oregon to Mumbai?",
    "How do I move objects older than 90 days to cheaper storage automatically?",
    "I accidentally posted my secret key in a public chat. What now?",
    "What do I pay for downloading 250 gigabytes to my laptop this month?",
    "Is there a limit to how many objects a bucket can hold?",
    "Can I make a block volume of 20 terabytes?",
    "Do snapshots survive if I delete the volume?",
    "Which regions do you have in Europe?",
    "Will you refund me for yesterday's outage?",
    "Can an access key be restricted to a single bucket?",
    "How are snapshots billed?",
    "Is traffic between two of my regions free?",
)

# The input-grounded passage of the spec scenario (~400 tokens with SmolLM2's tokenizer).
SPEC_PASSAGE = """The city council met on Tuesday evening to discuss the future of the old
harbour warehouses. The buildings, built in 1898 to store grain and later used for
cotton, have stood empty since the port moved downstream in 1987. Three proposals were
on the table. The first, from a housing cooperative, would turn the two larger
warehouses into 140 apartments, a third of them at reduced rent, and keep the brick
facades and the iron cranes on the quay. The second, from a private developer, would
demolish all four buildings and build a hotel with 220 rooms, a conference centre and
an underground car park for 400 cars. The third, from the city's own culture
department, would keep the smallest warehouse as a market hall with room for 60
stalls, and open the quay as a public park with a swimming pool in the old dock.
Supporters of the cooperative said that the city needs affordable homes more than
anything else, and that the plan keeps the character of the waterfront. The developer
argued that only a hotel brings enough money to pay for the repair of the quay wall,
which engineers estimate at 18 million euros, and that the project would create about
300 jobs. Critics answered that the car park would bring more traffic into narrow
streets that already flood during storms. The culture department's plan was the
cheapest, at 9 million euros, but it leaves the three other buildings without a use.
After four hours of debate, the council voted to ask the cooperative and the culture
department to combine their plans, and to report back in March with a budget that
includes the quay wall. The developer said it would consider its options. The mayor
closed the meeting by thanking the two hundred residents who came to listen, most of
whom stayed until the end."""

SPEC_TASKS = (
    (
        "rewrite",
        "Rewrite the following text in plain, simple English for a school "
        "newsletter. Keep every fact and number.\n\n{text}",
    ),
    (
        "correct",
        "Correct the spelling mistakes in the following text. Output the "
        "corrected text only, unchanged otherwise.\n\n{text}",
    ),
    (
        "extract",
        "List every number in the following text, each with the sentence it "
        "comes from, copied word for word.\n\n{text}",
    ),
)
