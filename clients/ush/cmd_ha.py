"""ush's HA command (issue 15, part B): fenced -- an administrator's word that
a lost host is off, so that its VMs may be restarted elsewhere."""

from .outcome import Call, Outcome


async def cmd_fenced(shell, args):
    lnm, evidence = args.lnm, args.evidence

    async def fenced():
        result = await shell.live_client().confirm_fenced(lnm, evidence)
        hold = result["fenced"]
        lines = [f"LNM {lnm} is fenced ({hold.get('evidence')}); its lost VMs may now be "
                 "restarted elsewhere."]
        if hold.get("restarted"):
            lines.append(f"Restarted elsewhere already: {len(hold['restarted'])} VMs.")
        return Outcome("\n".join(lines), result)
    return Call(fenced)


def register(declare):
    parser = declare("fenced", cmd_fenced)
    parser.add_argument("--evidence", metavar="TEXT")
    parser.add_argument("lnm")
