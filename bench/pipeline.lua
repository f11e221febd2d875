-- wrk script: HTTP/1.1 pipelining, DEPTH requests per write (default 16).
--   wrk -t1 -c50 -d5s -s bench/pipeline.lua http://127.0.0.1:PORT/ -- 16
-- wrk counts every response, so Requests/sec is responses per second.
init = function(args)
   local depth = tonumber(args[1]) or 16
   local r = {}
   for i = 1, depth do
      r[i] = wrk.format(nil, "/")
   end
   req = table.concat(r)
end

request = function()
   return req
end
