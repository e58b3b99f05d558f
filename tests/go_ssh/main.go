// An ssh(1)-like command for git's GIT_SSH_COMMAND on Go's golang.org/x/crypto/ssh, with its
// default algorithms: tests/integration/test_client_families.py builds it with Debian's Go and
// x/crypto (GOPATH mode, no module download).
//
//	go_ssh -i KEY -k KNOWN_HOSTS [-o SendEnv=GIT_PROTOCOL] [-p PORT] USER@HOST COMMAND
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

type options []string

func (o *options) String() string     { return strings.Join(*o, ",") }
func (o *options) Set(v string) error { *o = append(*o, v); return nil }

func fail(err error) {
	fmt.Fprintln(os.Stderr, "go_ssh:", err)
	os.Exit(255)
}

func main() {
	key := flag.String("i", "", "private key file")
	known := flag.String("k", "", "known_hosts file")
	port := flag.String("p", "22", "port")
	var opts options // git's -o SendEnv=GIT_PROTOCOL
	flag.Var(&opts, "o", "ssh option")
	flag.Parse()
	destination, command := flag.Arg(0), flag.Arg(1)
	user, host := "git", destination
	if at := strings.LastIndex(destination, "@"); at >= 0 {
		user, host = destination[:at], destination[at+1:]
	}
	pem, err := os.ReadFile(*key)
	if err != nil {
		fail(err)
	}
	signer, err := ssh.ParsePrivateKey(pem)
	if err != nil {
		fail(err)
	}
	hostKeys, err := knownhosts.New(*known)
	if err != nil {
		fail(err)
	}
	config := &ssh.ClientConfig{User: user, Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback: hostKeys}
	client, err := ssh.Dial("tcp", host+":"+*port, config)
	if err != nil {
		fail(err)
	}
	session, err := client.NewSession()
	if err != nil {
		fail(err)
	}
	for _, opt := range opts {
		name := strings.TrimPrefix(opt, "SendEnv=")
		if name != opt && os.Getenv(name) != "" {
			session.Setenv(name, os.Getenv(name))
		}
	}
	session.Stdin, session.Stdout, session.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := session.Run(command); err != nil {
		if exit, ok := err.(*ssh.ExitError); ok {
			os.Exit(exit.ExitStatus())
		}
		fail(err)
	}
}
