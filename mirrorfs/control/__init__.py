"""What a served disk is doing and who may change it: the phase machine and its controllers.

    controller.py  the part every controller shares: one phase lock, events, status, commands
    mirror.py      `serve`: one disk mirrored from SOURCE to DEST, switched or cancelled
    migration.py   `start`: the Mirrored-Snapshot migration (oVirt's Steps 3-5)
    export.py      `export`: a disk served for its life between migrations
    evacuation.py  `start --switch-first`: the source chain evacuated into one new image
    group.py       `start NAME NAME...`: several named disks moved, switched and reverted as one
    lender.py      who lends a migration its disk (an export, the host service), the switch's commit
    basecopy.py    Step 4: the read-only base copied through NBD, paced by the host budget
    options.py     what the operator asks of a served disk, validated once
    events.py      the event log of a served disk
    socket.py      the control socket's command table served over JSON lines
    stopreport.py  what is said when a stop leaves the sides different
"""
