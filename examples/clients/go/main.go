// Command llmcluster-go-client is an example Go client of llmcluster's public
// Generate service, built on stubs generated from protos/ (see generate.sh).
//
//	./bin/llmcluster-go-client --target 127.0.0.1:50051 \
//	    --prompt "The capital of France is" --max-new-tokens 16 --mode stream
//
// Modes (each prints human-readable lines, then one JSON summary as the last line):
//
//	stream  stream a greedy generation, printing each message's tokens as they arrive
//	cancel  stream, then cancel the call after --cancel-after messages
//	bad     send a request the server must reject (top_p defaults to 2) and print the
//	        gRPC status code name and message
//
// Structured output (any mode, at most one): --json-schema FILE (the output is JSON valid
// under the schema in FILE), --regex RE (the output matches RE), --choice a,b,c (the
// output is exactly one of the comma-separated strings).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	llmclusterv1 "github.com/llmcluster/llmcluster/gen/go/llmcluster/v1"
	rpccode "google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

type options struct {
	target       string
	mode         string
	prompt       string
	maxNewTokens uint
	cancelAfter  int
	topP         float64
	ignoreEOS    bool
	timeout      time.Duration
	token        string
	tlsCA        string
	constraint   *llmclusterv1.Constraint // nil: free generation
}

// summary is the machine-readable last line; its keys match the Node client's.
type summary struct {
	Mode         string              `json:"mode"`
	RequestID    string              `json:"request_id,omitempty"`
	TokenIDs     []uint32            `json:"token_ids"`
	Text         string              `json:"text"`
	Messages     int                 `json:"messages"`
	FinishReason string              `json:"finish_reason,omitempty"`
	Usage        *llmclusterv1.Usage `json:"usage,omitempty"`
	Code         string              `json:"code"`
	CodeNumber   codes.Code          `json:"code_number"`
	Message      string              `json:"message,omitempty"`
}

// codeName is the canonical upper-case name of a status code ("INVALID_ARGUMENT"),
// the same in every gRPC language (Go's codes.Code.String() says "InvalidArgument").
func codeName(c codes.Code) string {
	if name, ok := rpccode.Code_name[int32(c)]; ok {
		return name
	}
	return fmt.Sprintf("CODE_%d", c)
}

func parseFlags() options {
	var o options
	var timeoutS float64
	flag.StringVar(&o.target, "target", "127.0.0.1:50051", "router or worker address host:port")
	flag.StringVar(&o.mode, "mode", "stream", "stream, cancel or bad")
	flag.StringVar(&o.prompt, "prompt", "The capital of France is", "prompt text")
	flag.UintVar(&o.maxNewTokens, "max-new-tokens", 16, "tokens to generate")
	flag.IntVar(&o.cancelAfter, "cancel-after", 2, "cancel mode: messages to read before cancelling")
	flag.Float64Var(&o.topP, "top-p", -1, "nucleus mass (unset: server default; bad mode: 2)")
	flag.BoolVar(&o.ignoreEOS, "ignore-eos", false, "keep generating past end-of-sequence")
	flag.Float64Var(&timeoutS, "timeout-s", 60, "deadline of the call, seconds")
	flag.StringVar(&o.token, "token", os.Getenv("LLMCLUSTER_TOKEN"),
		"API key sent as 'authorization: Bearer' (default: $LLMCLUSTER_TOKEN)")
	flag.StringVar(&o.tlsCA, "tls-ca", os.Getenv("LLMCLUSTER_TLS_CA"),
		"CA of the router's certificate: connect with TLS (default: $LLMCLUSTER_TLS_CA)")
	var schemaFile, regex, choice string
	flag.StringVar(&schemaFile, "json-schema", "", "structured output: JSON valid under the schema in this file")
	flag.StringVar(&regex, "regex", "", "structured output: the output matches this regular expression")
	flag.StringVar(&choice, "choice", "", "structured output: exactly one of these comma-separated strings")
	flag.Parse()
	set := 0
	for _, v := range []string{schemaFile, regex, choice} {
		if v != "" {
			set++
		}
	}
	if set > 1 {
		fmt.Fprintln(os.Stderr, "give at most one of --json-schema, --regex, --choice")
		os.Exit(2)
	}
	switch {
	case schemaFile != "":
		schema, err := os.ReadFile(schemaFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		o.constraint = &llmclusterv1.Constraint{Kind: &llmclusterv1.Constraint_JsonSchema{JsonSchema: string(schema)}}
	case regex != "":
		o.constraint = &llmclusterv1.Constraint{Kind: &llmclusterv1.Constraint_Regex{Regex: regex}}
	case choice != "":
		o.constraint = &llmclusterv1.Constraint{Kind: &llmclusterv1.Constraint_Choice{
			Choice: &llmclusterv1.Choices{Options: strings.Split(choice, ",")}}}
	}
	switch o.mode {
	case "stream", "cancel":
	case "bad":
		if o.topP < 0 {
			o.topP = 2
		}
	default:
		fmt.Fprintf(os.Stderr, "unknown mode %q\n", o.mode)
		os.Exit(2)
	}
	o.timeout = time.Duration(timeoutS * float64(time.Second))
	return o
}

func buildRequest(o options) *llmclusterv1.GenerateRequest {
	// Temperature 0 = greedy; unset optional fields take the server default.
	params := &llmclusterv1.SamplingParams{
		Temperature:  0,
		MaxNewTokens: proto.Uint32(uint32(o.maxNewTokens)),
		IgnoreEos:    o.ignoreEOS,
		Constraint:   o.constraint,
	}
	if o.topP >= 0 {
		params.TopP = proto.Float32(float32(o.topP))
	}
	return &llmclusterv1.GenerateRequest{Prompt: o.prompt, Params: params}
}

// stream runs GenerateStream; cancelAfter > 0 cancels the call after that many messages.
func stream(ctx context.Context, client llmclusterv1.GenerateClient, o options, cancelAfter int) (summary, error) {
	s := summary{Mode: o.mode, TokenIDs: []uint32{}}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	call, err := client.GenerateStream(ctx, buildRequest(o))
	if err != nil {
		return s, err
	}
	cancelled := false
	for {
		msg, err := call.Recv()
		if errors.Is(err, io.EOF) {
			s.Code = codeName(codes.OK)
			return s, nil
		}
		if err != nil {
			if cancelled && status.Code(err) == codes.Canceled {
				s.Code, s.CodeNumber = codeName(codes.Canceled), codes.Canceled
				return s, nil
			}
			return s, err
		}
		s.Messages++
		s.RequestID = msg.GetRequestId()
		ids := make([]uint32, 0, len(msg.GetTokens()))
		for _, t := range msg.GetTokens() {
			ids = append(ids, t.GetId())
		}
		s.TokenIDs = append(s.TokenIDs, ids...)
		s.Text += msg.GetText()
		idsJSON, _ := json.Marshal(ids)
		textJSON, _ := json.Marshal(msg.GetText())
		fmt.Printf("tokens %s %s\n", idsJSON, textJSON)
		if msg.GetFinishReason() != llmclusterv1.FinishReason_FINISH_REASON_UNSPECIFIED {
			s.FinishReason = msg.GetFinishReason().String()
		}
		if msg.GetUsage() != nil {
			s.Usage = msg.GetUsage()
		}
		if cancelAfter > 0 && s.Messages >= cancelAfter && !cancelled {
			// Cancelling the context resets the HTTP/2 stream: the router cancels the
			// sequence on the worker, which frees its slot at the next iteration.
			cancelled = true
			cancel()
		}
	}
}

func printJSON(v interface{}) {
	out, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	fmt.Println(string(out))
}

func main() {
	o := parseFlags()
	transport := grpc.WithInsecure()
	if o.tlsCA != "" {
		creds, err := credentials.NewClientTLSFromFile(o.tlsCA, "")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		transport = grpc.WithTransportCredentials(creds)
	}
	conn, err := grpc.Dial(o.target, transport)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	defer conn.Close()
	client := llmclusterv1.NewGenerateClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	if o.token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+o.token)
	}

	cancelAfter := 0
	if o.mode == "cancel" {
		cancelAfter = o.cancelAfter
	}
	s, err := stream(ctx, client, o, cancelAfter)
	exit := 0
	if err != nil {
		st := status.Convert(err)
		s = summary{Mode: o.mode, TokenIDs: []uint32{}, Code: codeName(st.Code()),
			CodeNumber: st.Code(), Message: st.Message()}
		if o.mode == "bad" {
			fmt.Printf("rejected: %s: %s\n", s.Code, s.Message)
		} else {
			exit = 1 // an unexpected RPC error
		}
	} else if o.mode == "bad" {
		fmt.Fprintln(os.Stderr, "expected the server to reject the request")
		exit = 1
	}
	printJSON(s)
	conn.Close()
	os.Exit(exit)
}
