"""A DNS server for the web broker's tests, run inside the test's own network namespace
on the address the host's resolv.conf names (which, there, is nobody else's): every
name it is told about answers A with its first address, then with its second on every
later query (a name whose answer changes between two lookups); AAAA answers nothing.
It prints each A query it answers to stdout as "A name address".

    python3 dns.py LISTEN_ADDRESS name=first,second [name=first,second ...]
"""

import socket
import struct
import sys


def name_of(packet, at):
    labels = []
    while packet[at] != 0:
        n = packet[at]
        labels.append(packet[at + 1 : at + 1 + n].decode("ascii", "replace"))
        at += 1 + n
    return ".".join(labels).lower(), at + 1


def main():
    listen = sys.argv[1]
    names = {}
    for spec in sys.argv[2:]:
        name, addrs = spec.split("=")
        names[name.lower()] = addrs.split(",")
    asked = {}
    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((listen, 53))
    print("ready", flush=True)
    while True:
        packet, peer = sock.recvfrom(512)
        if len(packet) < 12:
            continue
        ident, flags, qd = struct.unpack("!HHH", packet[:6])
        name, end = name_of(packet, 12)
        qtype, qclass = struct.unpack("!HH", packet[end : end + 4])
        question = packet[12 : end + 4]
        answers = b""
        count = 0
        if name in names and qtype == 1:
            n = asked.get(name, 0)
            asked[name] = n + 1
            address = names[name][0 if n == 0 else 1]
            answers = (
                b"\xc0\x0c"
                + struct.pack("!HHIH", 1, 1, 0, 4)
                + socket.inet_aton(address)
            )
            count = 1
            print("A", name, address, flush=True)
        rcode = 0 if name in names else 3
        header = struct.pack("!HHHHHH", ident, 0x8180 | rcode, 1, count, 0, 0)
        sock.sendto(header + question + answers, peer)


if __name__ == "__main__":
    main()
